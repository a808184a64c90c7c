from fenghuo.cli import main

raise SystemExit(main())
