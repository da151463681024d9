"""The producer: publishes reviews from files or stdin as the contract's JSON records."""
