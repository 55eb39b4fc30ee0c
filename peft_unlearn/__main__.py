from peft_unlearn.cli import main

raise SystemExit(main())
