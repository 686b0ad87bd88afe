"""Package discovery for the folders mapped into the ``auditkit`` namespace (pyproject's
``package-dir``): every package under them is found, so a new check is one folder, not a list edit.
The rest of the configuration is in pyproject.toml."""

from setuptools import find_packages, setup

MAPPED = {
    "auditkit": "auditkit",
    "auditkit.checks": "checks",
    "auditkit.policies": "policies",
    "auditkit.reports": "reports",
    "auditkit.fixtures": "fixtures",
}


def packages() -> list[str]:
    """Every importable package: each mapped folder and the packages found below it."""
    found = []
    for name, folder in MAPPED.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(folder)]
    return sorted(set(found))


if __name__ == "__main__":
    setup(packages=packages())
