"""moto server with its writing calls handled one at a time per stream or table.

moto's server answers each request on its own thread, and its backends take no locks: two
PutRecords calls on one Kinesis shard at once can both read the same last sequence number and
the second overwrites the first record (readers that had not read it yet never see it), and
two conditional DynamoDB writes at once can both pass their condition. AWS does neither, and
GeoStream's guarantees rest on both. The AWS SDK retries a call whose answer is late while the
first try may still be running in moto, so the tests make such overlaps; this wrapper keeps
moto's threads (connections stay open) but lets one writing call at a time per stream or
table into its application.
Run as moto_server is: python moto_serialized.py -H HOST -p PORT.
"""

import io
import json
import threading

import moto.server

_serve = moto.server.run_simple

# The calls that change a stream or a table; reads (GetRecords, GetItem, Query, Scan) and the
# other services run beside them as before, so a slow scan holds no write back.
_WRITES = (
    ".PutRecords",
    ".PutRecord",
    ".PutItem",
    ".UpdateItem",
    ".DeleteItem",
    ".BatchWriteItem",
    ".TransactWriteItems",
)

# One lock per stream or table: writes to different ones (positions, rule state, the alerts
# stream) do not wait for each other.
_locks = {}
_locks_guard = threading.Lock()


def _lock(name):
    with _locks_guard:
        return _locks.setdefault(name, threading.Lock())


def _resources(body):
    """The streams and tables a writing call touches, sorted (locks are taken in that order)."""
    try:
        request = json.loads(body or b"{}")
    except ValueError:
        return ["?"]
    names = set()
    for key in ("StreamName", "StreamARN", "TableName"):
        if isinstance(request.get(key), str):
            names.add(request[key].rsplit("/", 1)[-1])
    for item in request.get("TransactItems", []):
        for action in item.values():
            if isinstance(action, dict) and isinstance(action.get("TableName"), str):
                names.add(action["TableName"])
    names.update(request.get("RequestItems", {}).keys())
    return sorted(names) or ["?"]


def _serialized(app):
    def application(environ, start_response):
        if not environ.get("HTTP_X_AMZ_TARGET", "").endswith(_WRITES):
            return app(environ, start_response)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        locks = [_lock(name) for name in _resources(body)]
        for lock in locks:
            lock.acquire()
        try:
            # The whole answer is made inside the locks (a WSGI answer may be lazy).
            return list(app(environ, start_response))
        finally:
            for lock in reversed(locks):
                lock.release()

    return application


def _run_simple(host, port, app, **options):
    return _serve(host, port, _serialized(app), **options)


moto.server.run_simple = _run_simple

if __name__ == "__main__":
    moto.server.main()
