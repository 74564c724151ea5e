//! Load-test support: the baselines `make bench` compares Turnpike against.
