"""An EC2 simulator for tests and for trying kiyot-py without an AWS account.

moto in server mode (over HTTP, as boto3 talks to EC2), with EC2's rules where moto
lacks them (`gaps.py`), and a real local cell behind every instance (`machines.py`),
laid out by `simulator.py`; `kiyot-ec2sim --help` runs it.
"""
