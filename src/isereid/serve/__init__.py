"""``isereid serve``: a local, read-only web view of a training run (curves, pseudo-identities of
every recorded epoch) and a search over a gallery index. :mod:`.state` reads the run folder and
answers the questions (pure Python, no web framework); :mod:`.app` is the FastAPI application and
the server around it (``pip install 'isereid[serve]'``); ``static/`` holds the page."""
