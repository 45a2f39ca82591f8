"""`python -m csnn.train`: the tutorial's command line (csnn.cli), at the tutorial's name. A file of
its own, so that the training loop (csnn.train) never imports the command line that imports it."""
import sys

from csnn.cli import main

sys.exit(main())
