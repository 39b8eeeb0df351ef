import sys

from nemo_opdlm.plan.cli import plan_main

sys.exit(plan_main())
