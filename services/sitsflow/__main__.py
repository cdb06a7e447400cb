from sitsflow.cli import main

raise SystemExit(main())
