from qinglm.cli import main

raise SystemExit(main())
