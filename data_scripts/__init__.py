"""Data preparation: the miniature data sets (`build_mini_data.py`, a script) and the paper's real data sets
(`data_scripts.real`, a package: `python -m data_scripts.real --help`)."""
