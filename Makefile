# `make test`: everything the test suite needs on a fresh Debian machine, then the suite.
WORDNET_DEBS = wordnet-base wordnet-sense-index

test:
	@if [ ! -f /usr/share/wordnet/data.noun ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && apt-get install -y -qq $(WORDNET_DEBS)) >/dev/null \
		|| echo "could not install $(WORDNET_DEBS): METEOR tests will skip"; fi
	pip install -q -e '.[test]'
	python -m pytest -q

.PHONY: test
