from asobi.cli import main

raise SystemExit(main())
