from ner_merge.demo import main

main()
