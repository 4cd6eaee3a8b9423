"""Starts LocalStack 4.9 (localstack-core) as a plain process, with DynamoDB served by the
DynamoDB Local jar that `scripts/localstack` installs from npm.

LocalStack's DynamoDB provider forwards every request to DynamoDB Local, AWS's own engine.
Outside its Docker image LocalStack would download that jar, a Java 21 runtime and a Java
agent (which only lifts DynamoDB Local's limit of 20 GSIs per table; GeoStream's tables
have at most one) from hosts this project's machines cannot reach. This launcher points it at
the installed jar and the machine's Java 17 (DynamoDB Local needs 17 or newer) instead, then
runs LocalStack's own entry point.

Environment: GEOSTREAM_DYNAMODB_LOCAL_DIR, the folder holding DynamoDBLocal.jar.
"""

import os
import sys

from localstack.services.dynamodb import packages, server

DYNAMODB_LOCAL_DIR = os.environ["GEOSTREAM_DYNAMODB_LOCAL_DIR"]
if not os.path.isfile(os.path.join(DYNAMODB_LOCAL_DIR, "DynamoDBLocal.jar")):
    sys.exit(f"no DynamoDBLocal.jar in {DYNAMODB_LOCAL_DIR} (GEOSTREAM_DYNAMODB_LOCAL_DIR)")

installer = packages.DynamoDBLocalPackageInstaller
installer.install = lambda self, target=None: None
installer.get_installed_dir = lambda self: DYNAMODB_LOCAL_DIR
installer.get_java_env_vars = lambda self: {
    name: os.environ[name] for name in ("PATH", "JAVA_HOME") if name in os.environ
}

shell_command = server.DynamodbServer._create_shell_command


def without_java_agent(self):
    return [arg for arg in shell_command(self) if not arg.startswith("-javaagent:")]


server.DynamodbServer._create_shell_command = without_java_agent

from localstack.runtime.main import main  # noqa: E402  (after the patches above)

sys.exit(main())
