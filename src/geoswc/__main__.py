from geoswc.cli import main

raise SystemExit(main())
