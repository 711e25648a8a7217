from vlmprune.cli import main

raise SystemExit(main())
