"""Read rendered guestinfo entries the way cloud-init does, and validate them with its schema.

Run by the system python3 that has Debian's cloud-init (the project venv has not): reads
{"case": {"guestinfo.userdata": ..., ...}} as JSON on stdin, writes one result per case.
Each case goes through cloud-init's own VMware datasource (its VMX_GUESTINFO_* variables
path: the same decoding as guestinfo), its user-data schema validator (strict) and its
netplan v2 parser.
"""

import json
import os
import sys
import tempfile

from cloudinit import helpers, util
from cloudinit.config.schema import SchemaValidationError, get_schema, validate_cloudconfig_schema
from cloudinit.net.network_state import parse_net_config_data
from cloudinit.sources.DataSourceVMware import DataSourceVMware, get_guestinfo_envvar_key_name


def check(entries, schema, workdir):
    for name in [n for n in os.environ if n.startswith("VMX_GUESTINFO")]:
        del os.environ[name]
    os.environ["VMX_GUESTINFO"] = "1"
    for key, value in entries.items():
        os.environ[get_guestinfo_envvar_key_name(key.removeprefix("guestinfo."))] = value
    paths = helpers.Paths({"cloud_dir": workdir, "run_dir": workdir})
    source = DataSourceVMware(sys_cfg={}, distro=None, paths=paths)
    if not source._get_data():
        return {"read": False}
    result = {
        "read": True,
        "instance_id": source.get_instance_id(),
        "hostname": source.metadata.get("local-hostname"),
        "redact": source.metadata.get("redact"),
        "userdata_header": source.userdata_raw.splitlines()[0],
        "schema_errors": None,
    }
    try:
        config = util.load_yaml(source.userdata_raw)
        validate_cloudconfig_schema(config, schema, strict=True, log_details=False)
    except SchemaValidationError as exc:
        result["schema_errors"] = str(exc)
    state = parse_net_config_data(source.network_config, skip_broken=False)
    result["interfaces"] = [
        {
            "name": iface["name"],
            "mac_address": iface.get("mac_address"),
            "subnets": [
                {k: s.get(k) for k in ("type", "address", "prefix", "gateway", "dns_nameservers")}
                for s in iface.get("subnets", [])
            ],
        }
        for iface in state.iter_interfaces()
    ]
    result["nameservers"] = state.dns_nameservers
    result["search"] = state.dns_searchdomains
    return result


def main():
    cases = json.load(sys.stdin)
    schema = get_schema()
    with tempfile.TemporaryDirectory() as workdir:
        out = {name: check(entries, schema, workdir) for name, entries in cases.items()}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
