"""Maps the repository's top-level folders into the one import root `loraserve`.

pyproject.toml holds the metadata; this file only discovers subpackages under each mapped
folder so that nobody has to list them by hand.
"""
from setuptools import find_packages, setup

ROOTS = {
    "loraserve": "services/core",
    "loraserve.inference": "services/inference",
    "loraserve.registry": "services/registry",
    "loraserve.kernels": "kernels",
}

packages, package_dir = [], {}
for name, folder in ROOTS.items():
    packages.append(name)
    package_dir[name] = folder
    for sub in find_packages(where=folder):
        packages.append(f"{name}.{sub}")
        package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(packages=packages, package_dir=package_dir, include_package_data=True,
      package_data={"loraserve": ["py.typed"], "loraserve.registry": ["migrations/*.ini", "migrations/**/*"]})
