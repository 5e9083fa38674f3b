"""Print every conda record of a lock as JSON: run by any py-rattler release (0.15 to 0.28).

    python tests/rattler_records_dump.py PIXI_LOCK

Output: ``{"<environment>/<platform>": [[name, version, build, subdir, sha256, md5, url,
depends], ...]}`` sorted, and for an (environment, platform) with PyPI packages
``"<environment>/<platform>/pypi": [[name, version, location, sha256, requires_dist,
requires_python], ...]``. Used by tests/test_lock_older_pixi.py in the older side venvs, so it
touches only API that every one of them has (0.15's platforms have no ``name``).
"""

import json
import sys

from rattler import LockFile


def main(path: str) -> None:
    lock = LockFile.from_path(path)
    out = {}
    for env_name, env in lock.environments():
        for platform in env.platforms():
            records = env.conda_repodata_records_for_platform(platform) or []
            key = f"{env_name}/{getattr(platform, 'name', str(platform))}"
            out[key] = sorted(
                [
                    r.name.normalized,
                    str(r.version),
                    str(r.build),
                    r.subdir,
                    r.sha256.hex() if r.sha256 else None,
                    r.md5.hex() if r.md5 else None,
                    r.url,
                    sorted(r.depends),
                ]
                for r in records
            )
            pypi = env.pypi_packages_for_platform(platform) or []
            if pypi:
                out[f"{key}/pypi"] = sorted(
                    [
                        p.name,
                        p.version,
                        p.location,
                        p.hashes.sha256.hex() if p.hashes and p.hashes.sha256 else None,
                        list(p.requires_dist),
                        p.requires_python,
                    ]
                    for p in pypi
                )
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
