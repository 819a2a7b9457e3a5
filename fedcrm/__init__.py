"""fedcrm: privacy-preserving federated analytics for customer (CRM) data."""

__version__ = "0.1.0"
