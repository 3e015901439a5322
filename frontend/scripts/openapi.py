"""Write the backend's OpenAPI document (no server, no Redis) to the file named on the command line.

Used by `npm run api-types:sync`; tests/test_api_types.py dumps the document the same way."""

import json
import sys

from deltalens.backend.app import create_app

with open(sys.argv[1], "w", encoding="utf-8") as out:
    out.write(json.dumps(create_app().openapi(), indent=1, sort_keys=True) + "\n")
