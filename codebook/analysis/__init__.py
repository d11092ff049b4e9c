"""Reading what codes mean, built on the core (``codebook.modeling``, ``codebook.steering``).

* ``index``: which codes fire on which tokens of a set of documents (a ``CodeIndex`` file).
* ``search``: codes for a topic (a regex over the indexed text), ranked by one of three statistics.
* ``word_topics``: the same search, precomputed per word over a whole corpus (no index needed).
* ``contexts``, ``promote``: a code's contexts and the tokens it promotes.
* ``steer_eval``, ``calibrate``: the paper's steering protocol, and presets chosen by it.
* ``topics``: named steering presets saved with a model.
* ``regex``: time-limited regexes, ``userdata``: where analysis files are written.
* ``cli``: the ``python -m codebook`` commands for all of the above.
"""
