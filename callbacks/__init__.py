# Not code: this file only lets an editable install (pip install -e .) find this folder as the package
# `tar_lightning.callback_overlays`, the way a wheel installs it (pyproject.toml, [tool.setuptools.package-dir]).
# setuptools' editable finder cannot map a folder without __init__.py to a subpackage that lives outside
# src/ (pypa/setuptools#4943). The library reads these files through tar_lightning.resources.shipped().
