from contract.cli import run
from models.cli import main

run(main)
