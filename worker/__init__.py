"""The worker: consume → validate → batch → [CLS] + head → publish → commit."""
