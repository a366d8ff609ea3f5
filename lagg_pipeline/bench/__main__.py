from lagg_pipeline.bench.yardstick import main

main()
