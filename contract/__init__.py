"""What producer, worker and models share: Kafka settings, the message schema, review files, CLI rules."""
