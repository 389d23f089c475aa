"""Architecture search: pruned shapes under a parameter budget, ranked after retraining."""
