from dora_analysis.cli import main

raise SystemExit(main())
