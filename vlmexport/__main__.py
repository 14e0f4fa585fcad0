from vlmexport.cli import main

raise SystemExit(main())
