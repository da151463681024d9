"""The model: a Hugging Face encoder's [CLS] vector followed by a logistic-regression head."""
