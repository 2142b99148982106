"""Side-by-side comparisons of models and training methods (the paper's tables and figures):
plan (read and check the config), runner (train the entries through fit), report (tables),
plots (figures)."""
