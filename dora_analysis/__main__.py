from dora_analysis.commands.main import main

raise SystemExit(main())
