"""The MONAI Label app folder (pass it as ``--app``); a package only so that ``main.py`` ships with the wheel."""
