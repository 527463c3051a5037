"""Flows: the upstream and CPaaS pipelines' steps, without Airflow. No flow imports
another."""
