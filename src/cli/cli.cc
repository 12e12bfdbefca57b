// build/sluice: the command line of main.cc, without Arrow sources (the wheel's command has them).

#include "cli/commands.h"

int main(int argc, char** argv) { return sluice::cli::run(argc, argv); }
