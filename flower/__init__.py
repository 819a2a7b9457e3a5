"""What both Flower adapters share: the protocol's wire form as Flower records."""
