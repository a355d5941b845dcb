"""Jobs: what the commands do, each composing the pipeline's stages (data -> models/train -> evaluate -> explain ->
report) around one run folder. The CLI parses arguments and calls these; the stages never import them.

- :mod:`.train`: ``train`` / ``demo`` (and ``--resume``);
- :mod:`.evaluate`: ``evaluate`` on the run's own splits or on other data (``RUN/evaluations/<name>/``);
- :mod:`.gallery`: the run's Grad-CAM gallery;
- :mod:`.explain_eval`: ``explain-eval``, faithfulness and sanity of the CAM methods;
- :mod:`.predict`: ``predict`` and ``explain`` over files and folders (:mod:`.names` names their inputs).
"""
