"""Run one staging in its own process, as a task process would: ``python -m tests.namespace_files.staging_worker SPEC``.

SPEC is a JSON object with ``url``, ``storage_options``, ``destination`` and ``settings`` (keyword
arguments of ``load_settings``). The result is printed as one JSON line.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from kestra_perf_provider.namespace_files import Namespace, stage_namespace_files
from kestra_perf_provider.namespace_files.settings import load_settings


def main() -> None:
    spec = json.loads(sys.argv[1])
    namespace = Namespace(spec["url"], storage_options=spec["storage_options"])
    result = stage_namespace_files(namespace, spec["destination"], settings=load_settings(**spec["settings"]))
    print(json.dumps(dataclasses.asdict(result), default=str), flush=True)


if __name__ == "__main__":
    main()
