"""`python -m csnn.train`: the tutorial's command line (csnn.cli), at the tutorial's name. A file of
its own, so that the training loop (csnn.train) never imports the command line that imports it."""

from csnn.argtypes import leave
from csnn.cli import main

leave(main())
