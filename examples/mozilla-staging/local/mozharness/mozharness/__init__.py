"""The mozharness stand-in's shared part (real mozharness keeps its library
in this package too): what every script reads from a build master."""

import json
import os


def read_buildprops():
    """The build's properties and sourcestamp from $PROPERTIES_FILE, as
    mozharness reads buildprops.json: (properties, sourcestamp), or a
    message saying why they cannot be read."""
    props_file = os.environ.get("PROPERTIES_FILE")
    if not props_file:
        return "ERROR: PROPERTIES_FILE is not set; run me from a build master"
    try:
        with open(props_file) as f:
            buildprops = json.load(f)
    except (OSError, ValueError) as e:
        return f"ERROR: cannot read the build properties from {props_file}: {e}"
    return buildprops.get("properties", {}), buildprops.get("sourcestamp", {})
