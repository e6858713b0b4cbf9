"""What `familial demo` (`familial.commands.demo`) is made of: the recipe, the corpus, the DaE
stage, the evidence report and the samples."""
