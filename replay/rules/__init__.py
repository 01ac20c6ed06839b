"""Rules: what `replay filter`, `play` and `capture` keep, change and hand to outside code.

``filters.py`` decides which exchanges stay, ``rewrites.py`` changes the bytes of what stays,
``rulesfile.py`` reads the same rules from a TOML file, ``ruleset.py`` composes them (filters,
then rewrites, then the middleware process, then Python plugins) behind one ``Rules.apply``.
"""
