"""The command line, one file per sub-command of ``agent-attention``.

Convention: ``commands/<name>.py`` (``train_det`` for ``train-det``) holds that command's argparse
parser and ``main(argv) -> int``; library code never imports from here. ``agent_attention.cli``
dispatches to them, importing a command's module only when it runs.
"""
