"""Federated DP analytics: customer statistics across firms, each firm on its own budget.

* :mod:`~fedcrm.analytics.spec` - the query (``query.toml``), validated and fingerprinted;
* :mod:`~fedcrm.analytics.statistics` - a firm's bounded-contribution statistics on an integer
  grid, and the query's public release layout;
* :mod:`~fedcrm.analytics.estimates` - the coordinator's estimates, noise and 95% intervals from
  the noisy totals.

The firm-side release (noise, ledger, audit) is :meth:`fedcrm.node.FirmNode.answer_query`; the
coordinator's side over Flower is :mod:`fedcrm.server.analytics`.
"""
