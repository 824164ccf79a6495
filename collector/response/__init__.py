"""The collector's hands: alerts delivered through the outbox, replacements behind safety
rails, and break-glass access.

- ``config``: ``[[sink]]``, ``[[action]]``, ``[[pool]]``, ``[response]``, ``[breakglass]``.
- ``alerts``: the ``alert`` job (incidents by dedup key, storm grouping) and the ``deliver``
  job (one sink, retries with backoff through the job's next attempt, rate limits, re-sends).
- ``rails``: the per-pool budget, storm breaker, image quarantine, dry-run and holds.
- ``replace``: the ``replace`` job (exactly one open replacement per host) and the
  ``replace_verify`` job (did the host go away? ask again if not).
- ``breakglass``: announced SSH sessions, attributed logins, deferred replacement.
- ``ledger``: their tables; ``routes`` and ``cli``: the API and the commands.

This package's ``__init__`` imports nothing, so reading the configuration stays light.
"""
