from benchmarks.gpu.kit import main

raise SystemExit(main())
