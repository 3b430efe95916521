from peftscale.cli import main

raise SystemExit(main())
