"""Built-in checks, one module per family (installed as ``auditkit.checks``).

Each module holds plain functions that compute its numbers and one :class:`auditkit.check.Check`
subclass. The built-ins are registered under the entry-point group ``auditkit.checks`` exactly as
third-party checks are, and discovered lazily; importing this package imports no check.
"""
