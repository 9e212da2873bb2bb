"""The reference bank, in three rooms and an entry point.

- :mod:`himatch_med.bank.data`: :class:`~himatch_med.bank.data.Bank` (frozen arrays and their typed description,
  :class:`~himatch_med.bank.data.BankInfo`), the format, the bank's id, the check against a query's settings;
- :mod:`himatch_med.bank.build`: building from prepared normal volumes and calibrating (tensors only);
- :mod:`himatch_med.bank.store`: opening a stored bank, building one from reference files, the cache, and the
  recalibration an evaluation row needs;
- ``python -m himatch_med.bank build REFERENCES -o BANK`` (:mod:`himatch_med.bank.__main__`).

Nothing is imported here, so that ``python -m himatch_med.bank --help`` stays instant.
"""
