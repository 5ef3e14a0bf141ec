"""reinforge's built-in `type: module.fn` dataset transforms.

A `type:` that is not a registered format name is looked up as `module.fn`: first as a Python file
in the working directory (`module.py`, or `package/module.py` for `package.module.fn`), then as a
module of this package, then as any importable module. See `reinforge.data.formats.transform`.
"""
