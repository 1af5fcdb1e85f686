"""Old name of service/launcher.py, kept only until every branch imports the new one; removed after."""
from service.launcher import *  # noqa: F401,F403
from service.launcher import REPO, _alive  # noqa: F401

from loadtests.bench import FLOOR, floor_server  # noqa: F401
