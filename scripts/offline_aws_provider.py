"""An offline stand-in for the AWS Terraform provider, for `terraform validate` only.

The real provider binary is in no registry this project's machines reach. Its schema is: the
npm package @cdktf/provider-aws is generated from it (provider 6.25.0), and every generated
resource class says, per argument, its Terraform name, whether it is a block or an attribute,
and its type (`synthesizeHclAttributes`), which arguments are required (the `.d.ts` config
interfaces), and which attributes are computed (the getters). This script reads that back into
a Terraform schema for the resource types infra/ uses, and serves it as a provider plugin with
the `tf` framework (PyPI), so that Terraform itself checks infra/ against it: unknown
arguments, blocks written as attributes or the reverse, wrong types, missing required
arguments, references to attributes that do not exist.

It validates; it cannot plan or apply (every operation beyond validation is refused).

    offline_aws_provider.py schema PACKAGE_DIR TYPES... > schema.json
    offline_aws_provider.py serve schema.json          (run by Terraform as the plugin)
"""

import json
import re
import sys
from pathlib import Path

SIMPLE_TYPES = {"string": "string", "number": "number", "boolean": "bool"}
COLLECTION_TYPES = {
    "stringList": ["list", "string"],
    "numberList": ["list", "number"],
    "booleanList": ["list", "bool"],
    "stringMap": ["map", "string"],
    "numberMap": ["map", "number"],
    "booleanMap": ["map", "bool"],
}
GETTER_TYPES = {
    "getStringAttribute": "string",
    "getNumberAttribute": "number",
    "getBooleanAttribute": "bool",
    "getListAttribute": ["list", "string"],
    "getNumberListAttribute": ["list", "number"],
    "getStringMapAttribute": ["map", "string"],
    "getNumberMapAttribute": ["map", "number"],
    "getBooleanMapAttribute": ["map", "bool"],
}
# One argument of a generated `attrs` object; its value expression is one line.
ENTRY = re.compile(
    r"(\w+): \{\n\s*value: ([^\n]*),\n\s*isBlock: (true|false),\n\s*type: \"(\w+)\",\n\s*storageClassType: \"(\w+)\",\n\s*\}"
)
NESTED_FUNCTION = re.compile(r"(?<![.\w])([a-z]\w*)ToHclTerraform\b")
COMPUTED_LIST = re.compile(r'this\._\w+ = new (\w+)List\(this, "(\w+)", (?:false|true)\);')
GETTER = re.compile(r"get (\w+)\(\) \{\s*return this\.(get\w+Attribute)\('(\w+)'\)")
REQUIRED_DOC = re.compile(r"#(\w+) [\w.]+#\w+\}\s*\*/\s*readonly \w+(\??):")
INTERFACE = re.compile(r"^export interface (\w+)(?: extends [\w.]+)? \{\n(.*?)^\}", re.S | re.M)


def kebab(type_name: str) -> tuple[str, str]:
    """`aws_kinesis_stream` -> (`kinesis-stream`, `KinesisStream`); data sources get `data-aws-`."""
    kind, name = type_name.split(":", 1)
    words = name.removeprefix("aws_").split("_")
    if kind == "data":
        return "data-aws-" + "-".join(words), "DataAws" + "".join(w.capitalize() for w in words)
    if kind == "provider":
        return "provider", "AwsProvider"
    return "-".join(words), "".join(w.capitalize() for w in words)


def read_sources(directory: Path, suffix: str) -> str:
    files = [directory / f"index{suffix}"] + sorted((directory / "index-structs").glob(f"*{suffix}"))
    return "\n".join(f.read_text() for f in files if f.exists())


def attrs_of(body: str) -> list[tuple[str, str, bool, str, str]]:
    start = body.find("const attrs = {")
    if start < 0:
        return []
    # The generated code follows every attrs object with this comment.
    end = body.find("// remove undefined attributes", start)
    text = body[start : end if end > 0 else len(body)]
    return [(m.group(1), m.group(2), m.group(3) == "true", m.group(4), m.group(5)) for m in ENTRY.finditer(text)]


def function_bodies(js: str) -> dict[str, str]:
    bodies = {}
    for m in re.finditer(r"^function (\w+)ToHclTerraform\(struct\) \{\n(.*?)^\}", js, re.S | re.M):
        bodies[m.group(1)] = m.group(2)
    return bodies


def required_by_interface(dts: str) -> dict[str, set[str]]:
    return {
        m.group(1): {r.group(1) for r in REQUIRED_DOC.finditer(m.group(2)) if r.group(2) == ""}
        for m in INTERFACE.finditer(dts)
    }


def block_schema(entries, functions, required: set[str], interfaces, seen=()) -> dict:
    attributes, blocks = {}, {}
    for name, value, is_block, kind, storage in entries:
        if is_block:
            nested = [n for n in NESTED_FUNCTION.findall(value) if n in functions]
            if not nested or nested[0] in seen:
                continue
            function = nested[0]
            interface = function[0].upper() + function[1:]
            blocks[name] = {
                "nesting": "set" if kind == "set" else "list",
                "block": block_schema(
                    attrs_of(functions[function]),
                    functions,
                    interfaces.get(interface, set()),
                    interfaces,
                    seen + (function,),
                ),
            }
            continue
        if kind == "simple" and storage in SIMPLE_TYPES:
            type_ = SIMPLE_TYPES[storage]
        elif storage in COLLECTION_TYPES:
            type_ = list(COLLECTION_TYPES[storage])
            if kind == "set":
                type_[0] = "set"
        else:
            type_ = "dynamic"
        attributes[name] = {"type": type_, "required": name in required}
    return {"attributes": attributes, "blocks": blocks}


def schema_of(package: Path, type_name: str) -> dict:
    directory_name, class_name = kebab(type_name)
    directory = package / "lib" / directory_name
    js, dts = read_sources(directory, ".js"), read_sources(directory, ".d.ts")
    if not js:
        raise SystemExit(f"{type_name}: no {directory} in the cdktf package")
    # The generated class (named after the type, with a suffix where a name clashed, as
    # S3BucketVersioningA).
    declaration = re.search(
        rf"^class ({class_name}\w*) extends cdktf\.Terraform(?:Resource|DataSource|Provider) ", js, re.M
    )
    if declaration is None:
        raise SystemExit(f"{type_name}: no generated class {class_name} in {directory}")
    class_name = declaration.group(1)
    main = js[declaration.start() :]
    synth = main[main.find("synthesizeHclAttributes() {"):]
    interfaces = required_by_interface(dts)
    config_interface = f"{class_name}Config"
    schema = block_schema(attrs_of(synth), function_bodies(js), interfaces.get(config_interface, set()), interfaces)
    # Computed attributes: getters without a matching argument.
    for _, getter, name in GETTER.findall(main):
        if name not in schema["attributes"] and name not in schema["blocks"] and getter in GETTER_TYPES:
            schema["attributes"][name] = {"type": GETTER_TYPES[getter], "computed_only": True}
    # Computed lists of objects (as an ElastiCache endpoint's address and port): a generated
    # `...List` class whose `...OutputReference` elements have one getter per field.
    for element, name in COMPUTED_LIST.findall(main):
        if name in schema["attributes"] or name in schema["blocks"]:
            continue
        reference = re.search(rf"^class {element}OutputReference extends .*?^\}}", js, re.S | re.M)
        if reference is None:
            continue
        fields = {
            field: GETTER_TYPES[getter]
            for _, getter, field in GETTER.findall(reference.group(0))
            if GETTER_TYPES.get(getter) in ("string", "number", "bool")
        }
        if fields:
            schema["attributes"][name] = {"type": ["list", ["object", fields]], "computed_only": True}
    if not schema["attributes"] and not schema["blocks"]:
        raise SystemExit(f"{type_name}: no arguments found in {directory}: the generated code changed shape")
    return schema


def build(package: str, types: list[str]) -> dict:
    root = Path(package)
    return {t: schema_of(root, t) for t in types}


def serve(schema_file: str):
    from tf import runner, schema as s, types as t
    from tf.iface import DataSource, Resource
    from tf.provider import pb
    from tf.utils import Diagnostics

    # The framework knows set and single nesting; Terraform's list nesting is wanted too.
    class ListNestMode:
        pass

    s.NestedBlock._mode_map[ListNestMode] = pb.Schema.NestedBlock.NestingMode.LIST

    schemas = json.loads(Path(schema_file).read_text())

    class ObjectType(t.TfType):
        """An object of named, typed fields (the framework has no object type)."""

        def __init__(self, fields):
            self.fields = fields

        def encode(self, value):
            if value in (None, t.Unknown):
                return value
            return {k: self.fields[k].encode(v) for k, v in value.items()}

        def decode(self, value):
            if value in (None, t.Unknown):
                return value
            return {k: self.fields[k].decode(v) for k, v in value.items()}

        def tf_type(self):
            fields = ",".join(f'"{k}":{v.tf_type().decode()}' for k, v in sorted(self.fields.items()))
            return f'["object",{{{fields}}}]'.encode()

    def tf_type(spec):
        if spec == "string":
            return t.String()
        if spec == "number":
            return t.Number()
        if spec == "bool":
            return t.Bool()
        if spec == "dynamic":
            return t.NormalizedJson()
        outer, inner = spec
        if outer == "object":
            return ObjectType({field: tf_type(kind) for field, kind in inner.items()})
        return {"list": t.List, "set": t.Set, "map": t.Map}[outer](tf_type(inner))

    def attributes(block):
        result = []
        for name, a in block["attributes"].items():
            if a.get("computed_only"):
                result.append(s.Attribute(name, tf_type(a["type"]), computed=True))
            elif a["required"]:
                result.append(s.Attribute(name, tf_type(a["type"]), required=True))
            else:
                result.append(s.Attribute(name, tf_type(a["type"]), optional=True, computed=True))
        return result

    def nested(block):
        return [
            s.NestedBlock(
                name,
                s.NestMode.Set if b["nesting"] == "set" else ListNestMode,
                s.Block(attributes=attributes(b["block"]), block_types=nested(b["block"])),
            )
            for name, b in block["blocks"].items()
        ]

    def to_schema(block):
        return s.Schema(version=0, attributes=attributes(block), block_types=nested(block))

    def refuse(*_args, **_kwargs):
        raise NotImplementedError("the offline AWS provider validates only")

    def make(kind, type_name, block):
        base = DataSource if kind == "data" else Resource
        members = {
            "get_name": classmethod(lambda cls: type_name.removeprefix("aws_")),
            "get_schema": classmethod(lambda cls: to_schema(block)),
            "__init__": lambda self, provider: None,
        }
        for method in ("read", "create", "update", "delete"):
            members[method] = refuse
        return type(type_name, (base,), members)

    resources = [make("resource", n.split(":", 1)[1], b) for n, b in schemas.items() if n.startswith("resource:")]
    data_sources = [make("data", n.split(":", 1)[1], b) for n, b in schemas.items() if n.startswith("data:")]
    provider_block = schemas["provider:aws"]

    class OfflineAws:
        def get_model_prefix(self):
            return "aws_"

        def get_provider_schema(self, diags: Diagnostics):
            return to_schema(provider_block)

        def full_name(self):
            return "registry.terraform.io/hashicorp/aws"

        def validate_config(self, diags, config):
            pass

        def configure_provider(self, diags, config):
            pass

        def get_data_sources(self):
            return data_sources

        def get_resources(self):
            return resources

        def get_functions(self):
            return []

        def new_resource(self, klass):
            return klass(self)

        def new_data_source(self, klass):
            return klass(self)

    runner.run_provider(OfflineAws(), sys.argv[3:])


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "schema":
        json.dump(build(sys.argv[2], sys.argv[3:]), sys.stdout, indent=1, sort_keys=True)
    elif len(sys.argv) >= 3 and sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        raise SystemExit(__doc__)
